"""What several test modules share (test modules never import each other): end-to-end runs of the real command
and their records (``runs``), the single-process oracles of the parallel layouts (``tensor_parallel``,
``pipeline``), and the tiny model and reference optimizers of the low-communication tests (``lowcomm``)."""
