calls = []  # double only


def unload_all_models():  # backend/memory_management.py: unload_all_models() -> free_memory(1e30, ..., free_all=True)
    calls.append("unload_all_models")
