"""Small helpers every stage may use, with no project imports of their own (atomic writes, TensorFlow's log level)."""
