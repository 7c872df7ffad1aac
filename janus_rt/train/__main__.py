"""python -m janus_rt.train ... (the same arguments as `janus-rt train`; works under torchrun)."""
from janus_rt.train.cli import main

main()
