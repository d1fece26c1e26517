//! Benchmarks for Keel: criterion micro-benchmarks of hot paths (`benches/`) and the side-by-side load
//! test against nginx and HAProxy (`compare.sh`). This library is empty; it only anchors the benches.
