//! The chaos suite: Outpost as a real child process under load, kill -9,
//! hostile input, an upstream outage and damage to its files. One module
//! per class; each prints its figures (`--nocapture` to see them). The CI
//! run is short; `OUTPOST_CHAOS=long` runs the long form (README.md).

mod common;

mod crash;
mod disk;
mod fuzz;
mod load;
mod outage;
