"""Structured outputs in the executor: grammars compiled off the step, logits masked per row."""
