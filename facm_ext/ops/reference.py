"""Plain-PyTorch references of the primal functions (no JVP code); tests JVP them with torch.func.jvp."""
