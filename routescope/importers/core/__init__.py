"""What every engine's importer shares: errors, input-file checks, the model's MoE layout, the
turns of a server response, and the tables handed to the store's writer (`tables.py`)."""
