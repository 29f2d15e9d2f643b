"""Plain-PyTorch references of the primal functions, one module per op family. No JVP code: tests take
torch.func.jvp of these in float64 and compare the fused ops against it."""
