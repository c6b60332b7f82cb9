//! `rpc.discover`: the OpenRPC document of the contract.

use serde_json::Value;

use super::NoParams;
use crate::rpc::dispatch::{Access, Methods};
use crate::rpc::{Ctx, RpcError};

pub fn register(methods: &mut Methods) {
    methods.register("rpc.discover", Access::Public, discover);
}

async fn discover(ctx: Ctx, _: NoParams) -> Result<Value, RpcError> {
    Ok(ctx.services.openrpc.clone())
}
