"""The gradio tab: a form built from the training config, its handlers, and the gradio 3/4 differences."""
