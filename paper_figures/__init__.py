"""The paper's figures, one script each: `fig_NAME.py` exposes `make(out_dir) -> [png, csv]`.

Run them all with `mfbench figures` (mfbench.figures.run_all)."""
