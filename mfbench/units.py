"""Units used across mfbench, defined once."""

MB = 2**20  # bytes in a mebibyte: every "MB" that mfbench reads or prints
