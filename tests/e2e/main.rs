//! End-to-end tests: the real `camflow` binary on real files, with the real stage kinds at
//! tiny sizes (16x16 phantoms, one epoch).

mod caching;
mod concurrency;
mod pipelines;
mod reference;
mod report;
mod science;
mod spec_errors;
mod support;
