"""Serve stage: a torch-free runtime for the engine dirs and the Gradio demo (not built yet)."""
