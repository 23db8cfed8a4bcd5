"""builder: one YAML file to a reproducible ollama + llama.cpp serving stack."""

__version__ = "0.1.0"
