import sys

from modules import paths, script_callbacks, script_loading

current_basedir = paths.script_path  # modules/scripts.py: current_basedir


def basedir():  # modules/scripts.py: basedir()
    return current_basedir


def load_scripts(script_files):
    """modules/scripts.py: load_scripts(), for (basedir, path) pairs: the extension folder is on sys.path
    only while its script runs, then the old list object comes back."""
    global current_basedir
    script_callbacks.clear_callbacks()
    syspath = sys.path
    loaded = []
    for base, path in script_files:
        try:
            if base != paths.script_path:
                sys.path = [base] + sys.path
            current_basedir = base
            loaded.append(script_loading.load_module(path))
        except Exception as e:  # A1111: errors.report("Error loading script: ..."), the WebUI goes on
            script_callbacks.reported.append((path, e))
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
    return loaded
