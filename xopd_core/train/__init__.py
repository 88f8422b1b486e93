"""Training loops: supervised fine-tuning (bootstrap) and, later, the X-OPD trainer."""
