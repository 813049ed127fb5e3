"""Static checks of exported graphs against what a deployment target accepts (no GPU needed)."""

from compress.checks.tensorrt import Violation, assert_tensorrt_ready, check_tensorrt

__all__ = ["Violation", "assert_tensorrt_ready", "check_tensorrt"]
