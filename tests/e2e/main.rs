//! End-to-end tests: the real `camflow` binary on real files, with the real stage kinds at
//! tiny sizes (16x16 phantoms, one epoch).

mod caching;
mod concurrency;
mod reference;
mod spec_errors;
mod support;
