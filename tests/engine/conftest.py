"""Engine tests run tiny models: one intra-op thread avoids the thread oversubscription that makes a
64-wide matmul take milliseconds on a busy 2-core machine (100x slower than single-threaded)."""
import torch

torch.set_num_threads(1)
