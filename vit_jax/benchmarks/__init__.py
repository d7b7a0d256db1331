"""Speed measurements: the timing harness and the `inference_time` job."""
