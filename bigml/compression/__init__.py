"""Compression helpers used by `bigml compress` (commands/compress.py).

    storage.py   load any model directory (plain HF, or bigml-quantized) and save compressed ones
    quantize.py  dynamic int8 (torch.ao), weight-only int8 / int4 (torchao), bf16 / fp16 casts
    prune.py     unstructured magnitude pruning (torch.nn.utils.prune), FFN neurons, whole layers
    distill.py   students (teacher with every other layer, or a named config) and the KD module
    measure.py   params, size on disk, CPU latency and throughput at a fixed batch x sequence
"""
