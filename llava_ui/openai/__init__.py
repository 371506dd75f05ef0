"""The OpenAI-compatible API over a backend: request and reply formats, and the routes. No Paddle."""
