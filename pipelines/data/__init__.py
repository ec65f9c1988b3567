"""Data on Ray Data: COCO → Parquet shards (`prepare`), shards → model-ready datasets (`datasets`), the shard
folder's manifest and ground truth (`shards`), and the generated sample set (`sample`)."""
