"""Put on a child process's PYTHONPATH by `routescope run`: its sitecustomize.py records MoE models."""
