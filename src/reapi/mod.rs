//! REAPI domain knowledge that is neither a service nor a store: walking
//! Directory trees and reading Actions, ActionResults and Operations. It
//! sits below `store/` (which may use it) and reads blobs only through
//! [`BlobStore`](crate::store::BlobStore).
//!
//! - [`tree`]: the one level-batched Directory walker.
//! - [`action`]: action inputs, referenced blobs, precondition failures.

pub mod action;
pub mod tree;
