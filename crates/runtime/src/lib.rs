//! ragfleet-runtime
