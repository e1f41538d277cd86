"""The models/ipadapter folder, registered without clobbering what another pack or extra_model_paths.yaml set."""
import os

import folder_paths

FOLDER = "ipadapter"


def register_model_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
        paths = list(paths)
        extensions = set(extensions)
    else:
        paths, extensions = [], set()
    if default not in paths:
        paths.append(default)
    # extra_model_paths.yaml creates the entry with no extensions: make sure the model file extensions are listed.
    extensions |= set(folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, extensions)
