"""The conversation side, no Paddle: turns, markers and the ChatML prompt, media loading, stop strings, export."""
