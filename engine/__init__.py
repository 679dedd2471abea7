"""Reference LLM-serving scheduler (torch) and its event emitter.

Kept import-light: `schedscope.engine.emitter` is torch-free; modules that need torch import it
themselves.
"""
