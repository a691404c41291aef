//! Compression at rest against real RocksDB.
