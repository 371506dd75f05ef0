"""The Gradio web chat over a backend: the page, its handlers, the chat state and what is drawn. No Paddle."""
