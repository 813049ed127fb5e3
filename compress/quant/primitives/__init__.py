"""Pure quantization math and formats: qparams, the quantized-weight record, packing (no model code)."""
