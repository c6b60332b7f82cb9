//! JSON-RPC 2.0: wire types, the one error mapping, the call context, the method table and
//! its dispatch, and the methods of every domain module. Transports only frame messages
//! and hand them to [`dispatch::Dispatcher::handle_message`].

pub mod context;
pub mod dispatch;
pub mod error;
#[cfg(test)]
pub(crate) mod fakes;
pub mod methods;
pub mod session;
pub mod shape;
pub mod wire;

pub use context::{Ctx, Services};
pub use dispatch::Dispatcher;
pub use error::{AuthFailure, RpcError};
pub use session::{Principal, Session, Transport};
