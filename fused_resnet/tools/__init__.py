"""The tools built on the library: the ``fused-resnet`` command (``cli``) and what it runs.

- ``check``: parity of a converted model with eager PyTorch against a float64 reference;
- ``bench``: images/s per ResNet stage, eager / fused / torch.compile; ``kernel_bench``: the
  fused ops alone, GB/s against the device's peak;
- ``audit``: bytes moved, counted (``traffic``: the counters);
- ``gpu``: the whole GPU verdict in one command (``make gpu``);
- ``common``: what they share (names, model and stage building, timing, machine, output).

The library (``fused_resnet`` outside this folder, and ``fused_resnet.kernels``) never
imports from here.
"""
