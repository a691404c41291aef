//! REAPI domain knowledge that is neither a service nor a store: resource
//! names, walking Directory trees, and reading Actions, ActionResults and
//! Operations. It sits below `store/` (which may use it) and reads blobs only
//! through [`BlobStore`](crate::store::BlobStore).
//!
//! - [`resource`]: ByteStream resource names, parsed and formatted.
//! - [`tree`]: the one level-batched Directory walker.
//! - [`action`]: action inputs, referenced blobs, precondition failures.

pub mod action;
pub mod resource;
pub mod tree;
