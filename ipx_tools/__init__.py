"""Developer tools around the pack: finding the ComfyUI host, building random-weight stand-in models."""
