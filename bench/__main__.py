"""Run every benchmark: `make bench` (figures printed and written to reports/bench/*.json).

The ImageNet-scale k-NN case needs ~7 GB of memory and ~3 minutes.
"""
from bench import bench_data, bench_knn, bench_masking, bench_pretrain

if __name__ == "__main__":
    for bench in (bench_data, bench_masking, bench_pretrain, bench_knn):
        print(f"== {bench.__name__}")
        bench.main()
