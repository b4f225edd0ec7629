from modules import sd_models, shared

changes = []  # double only


def checkpoint_change(ckpt_name: str, save=True, refresh=True):  # modules_forge/main_entry.py: checkpoint_change()
    new_info = sd_models.checkpoint_aliases.get(ckpt_name)
    if new_info is not None and new_info is sd_models.checkpoint_aliases.get(shared.opts.data.get('sd_model_checkpoint') or ''):
        return False
    shared.opts.set('sd_model_checkpoint', ckpt_name)
    changes.append(ckpt_name)  # Forge: refresh_model_loading_parameters(); the model loads at the next generation
    return True
