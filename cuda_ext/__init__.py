# Packaged copy of the kernel sources (installed as qrender_ns.cuda_ext), compiled on first use.
