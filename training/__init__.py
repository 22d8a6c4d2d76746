"""The run machinery every training script shares, one concern to a module: arguments,
devices and precision, distributed, files, checkpoints, console, progress, sizes and the loop.
Nothing here imports a script; only `loop` and `arguments` read the data code (utils.py)."""
