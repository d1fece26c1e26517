//! Load balancing: picking an endpoint (or a weighted route target) per connection or request.
//!
//! This crate knows nothing of sockets or runtimes. Balancer state is per worker (each worker builds
//! its own balancers from the snapshot), so a pick touches only core-local memory: no atomics, no locks.
