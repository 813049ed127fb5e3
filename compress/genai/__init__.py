"""The fused decoder graph of onnxruntime-genai's model builder, fed with compress's own weights."""
