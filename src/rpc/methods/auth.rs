//! `auth.register`, `auth.login`, `auth.authenticate`, `auth.logout`.

use serde::{Deserialize, Serialize};

use crate::auth::SignedIn;
use crate::core::{Email, Password, PasswordError};
use crate::rpc::dispatch::{Access, Methods};
use crate::rpc::methods::NoParams;
use crate::rpc::{Ctx, Principal, RpcError};
use crate::shapes::{time_json, UserJson};

pub fn register(methods: &mut Methods) {
    methods.register("auth.register", Access::Public, register_user);
    methods.register("auth.login", Access::Public, login);
    methods.register("auth.authenticate", Access::Public, authenticate);
    methods.register("auth.logout", Access::Public, logout);
}

#[derive(Debug, Deserialize)]
struct Credentials {
    email: String,
    password: String,
}

#[derive(Debug, Serialize)]
struct AuthResult {
    user: UserJson,
    token: String,
    expires_at: String,
}

#[derive(Debug, Serialize)]
struct UserResult {
    user: UserJson,
}

fn password_param(checked: Result<Password, PasswordError>) -> Result<Password, RpcError> {
    checked.map_err(|why| RpcError::invalid_params("password", why.to_string()))
}

/// Binds the session to the signed-in user and builds the answer.
fn bind(ctx: &Ctx, signed_in: SignedIn) -> AuthResult {
    let result = AuthResult {
        user: UserJson::from(&signed_in.user),
        token: signed_in.token,
        expires_at: time_json(signed_in.expires_at),
    };
    ctx.session.bind(Principal {
        user: signed_in.user,
        expires_at: signed_in.expires_at,
        fresh_key: None,
    });
    result
}

async fn register_user(ctx: Ctx, params: Credentials) -> Result<AuthResult, RpcError> {
    ctx.session.take_auth_call()?;
    let email = Email::parse(&params.email)
        .ok_or_else(|| RpcError::invalid_params("email", "not an email address"))?;
    let password = password_param(Password::for_new_account(params.password))?;
    let signed_in = ctx.services.accounts.register(email, password).await?;
    Ok(bind(&ctx, signed_in))
}

async fn login(ctx: Ctx, params: Credentials) -> Result<AuthResult, RpcError> {
    ctx.session.take_auth_call()?;
    // A malformed email can belong to no one: the same answer as any unknown email.
    let email = Email::parse(&params.email);
    let password = password_param(Password::presented(params.password))?;
    let signed_in = ctx.services.accounts.login(email, password).await?;
    Ok(bind(&ctx, signed_in))
}

#[derive(Debug, Deserialize)]
struct TokenParams {
    token: String,
}

async fn authenticate(ctx: Ctx, params: TokenParams) -> Result<UserResult, RpcError> {
    let (user, expires_at) = ctx.services.accounts.verify(&params.token).await?;
    let result = UserResult {
        user: UserJson::from(&user),
    };
    ctx.session.bind(Principal {
        user,
        expires_at,
        fresh_key: None,
    });
    Ok(result)
}

async fn logout(ctx: Ctx, _: NoParams) -> Result<bool, RpcError> {
    ctx.session.unbind();
    Ok(true)
}
