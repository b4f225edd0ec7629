"""Swaps in Forge's versions of the sd_models functions that differ from A1111 (modules/sd_models.py in Forge)."""


def apply(monkeypatch):
    from backend import memory_management
    from modules import sd_models, shared

    class FakeInitialModel:  # Forge sd_models.py: FakeInitialModel, model_data.sd_model before any load
        cond_stage_model = None
        chunk_length = 75

    def select_checkpoint():  # Forge sd_models.py: select_checkpoint() returns None without models
        info = sd_models.checkpoint_aliases.get(shared.opts.sd_model_checkpoint, None)
        if info is not None:
            return info
        if len(sd_models.checkpoints_list) == 0:
            print('You do not have any model!')
            return None
        return next(iter(sd_models.checkpoints_list.values()))

    def load_model(checkpoint_info=None, already_loaded_state_dict=None):  # Forge sd_models.py: a stub
        pass

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):  # Forge sd_models.py: a stub
        pass

    def unload_model_weights(sd_model=None, info=None):  # Forge sd_models.py: unload_model_weights()
        memory_management.unload_all_models()

    for name, fn in [("select_checkpoint", select_checkpoint), ("load_model", load_model),
                     ("reload_model_weights", reload_model_weights), ("unload_model_weights", unload_model_weights)]:
        monkeypatch.setattr(sd_models, name, fn)
    monkeypatch.setattr(sd_models.model_data, "sd_model", FakeInitialModel())
    # Forge initialize_util.py has the reload-on-change line commented out: the model loads at the next generation
    monkeypatch.setattr(shared.opts.data_labels["sd_model_checkpoint"], "onchange", None)
