"""Models: the mini world's tokenizer, tiny teacher/student builders, checkpoint I/O."""
