//! REAPI domain helpers shared by the services and the stores: things that
//! follow from the protocol itself rather than from any one layer.
//!
//! - [`resource`]: ByteStream resource names, parsed and formatted.

pub mod resource;
