"""Small worlds where every part is real and fast: a task, a policy and a reward model trained on it from scratch,
and the comparison of decoding methods on them (see ``docs/arithmetic.md``)."""
