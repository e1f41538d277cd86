"""The models/ipadapter folder, registered without clobbering what another pack or extra_model_paths.yaml set."""
import os

import folder_paths

FOLDER = "ipadapter"
EMBEDS_FOLDER = "ipx_embeds"


def register_model_folder(folder: str = FOLDER, extensions_wanted=None) -> None:
    extensions_wanted = extensions_wanted or folder_paths.supported_pt_extensions
    default = os.path.join(folder_paths.models_dir, folder)
    if folder in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[folder]
        paths = list(paths)
        extensions = set(extensions)
    else:
        paths, extensions = [], set()
    if default not in paths:
        paths.append(default)
    # extra_model_paths.yaml creates the entry with no extensions: make sure the model file extensions are listed.
    extensions |= set(extensions_wanted)
    folder_paths.folder_names_and_paths[folder] = (paths, extensions)


def register_model_folders() -> None:
    register_model_folder(FOLDER)
    register_model_folder(EMBEDS_FOLDER, {".safetensors"})
