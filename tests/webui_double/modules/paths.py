# modules/paths.py re-exports these from modules/paths_internal.py; tests point models_path at a tmp folder.
import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # paths_internal.py: script_path
data_path = script_path  # paths_internal.py: data_path (--data-dir)
models_path = os.path.join(data_path, "models")  # paths_internal.py: models_path (--models-dir)
extensions_dir = os.path.join(data_path, "extensions")  # paths_internal.py: extensions_dir
