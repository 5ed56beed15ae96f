"""How a loaded pipeline runs, apart from what it computes: the load options, device placement and offloading,
torch.compile, attention kernels, FP8 weights, weight-file read-ahead and the shared pipeline cache."""
