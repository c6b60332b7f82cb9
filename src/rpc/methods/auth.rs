//! `auth.register`, `auth.login`, `auth.authenticate`, `auth.logout`.

use serde::{Deserialize, Serialize};

use crate::auth::password::{MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS};
use crate::auth::TokenError;
use crate::core::{normalize_email, Role, User, UserId};
use crate::rpc::dispatch::{Access, Ctx, Methods};
use crate::rpc::methods::NoParams;
use crate::rpc::types::{time_json, UserJson};
use crate::rpc::{AuthFailure, Principal, RpcError};
use crate::store::StoreError;

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

fn email_param(email: &str) -> Result<String, RpcError> {
    normalize_email(email).ok_or_else(|| RpcError::invalid_params("email", "not an email address"))
}

fn check_password_length(password: &str, min: usize) -> Result<(), RpcError> {
    let chars = password.chars().count();
    if chars < min {
        return Err(RpcError::invalid_params(
            "password",
            format!("at least {min} characters"),
        ));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(RpcError::invalid_params(
            "password",
            format!("at most {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

/// Issues a token for the user, binds the session to them and builds the answer.
fn sign_in(ctx: &Ctx, user: User) -> AuthResult {
    let now = ctx.app.clock.now();
    let (token, expires_at) = ctx.app.tokens.issue(user.id, user.role, now);
    let result = AuthResult {
        user: UserJson::from(&user),
        token,
        expires_at: time_json(expires_at),
    };
    ctx.session.bind(Principal { user, expires_at });
    result
}

async fn register_user(ctx: Ctx, params: Credentials) -> Result<AuthResult, RpcError> {
    ctx.session.take_auth_call()?;
    let email = email_param(&params.email)?;
    check_password_length(&params.password, MIN_PASSWORD_CHARS)?;
    let hash = ctx
        .app
        .passwords
        .hash(params.password)
        .await
        .map_err(RpcError::internal)?;
    let user = User {
        id: UserId::new(),
        email,
        role: Role::Customer,
    };
    match ctx
        .app
        .store
        .insert_user(&user, &hash, ctx.app.clock.now())
        .await
    {
        Ok(()) => {}
        Err(StoreError::Duplicate(_)) => return Err(RpcError::EmailTaken),
        Err(other) => return Err(other.into()),
    }
    tracing::info!(user_id = %user.id, "user registered");
    Ok(sign_in(&ctx, user))
}

async fn login(ctx: Ctx, params: Credentials) -> Result<AuthResult, RpcError> {
    ctx.session.take_auth_call()?;
    // A malformed email can belong to no one: the same answer as any unknown email.
    let email = normalize_email(&params.email);
    check_password_length(&params.password, 0)?;
    let found = match &email {
        Some(email) => ctx.app.store.user_by_email(email).await?,
        None => None,
    };
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    // Verified against a dummy hash when the email is unknown, so both failures take as long.
    let matches = ctx.app.passwords.verify(params.password, hash).await;
    match user {
        Some(user) if matches => Ok(sign_in(&ctx, user)),
        _ => Err(RpcError::InvalidCredentials),
    }
}

#[derive(Debug, Deserialize)]
struct TokenParams {
    token: String,
}

async fn authenticate(ctx: Ctx, params: TokenParams) -> Result<UserResult, RpcError> {
    let principal = verify_token(&ctx.app, &params.token).await?;
    let user = UserJson::from(&principal.user);
    ctx.session.bind(principal);
    Ok(UserResult { user })
}

async fn logout(ctx: Ctx, _: NoParams) -> Result<bool, RpcError> {
    ctx.session.unbind();
    Ok(true)
}

/// Checks a token and finds its user (who must still exist).
pub async fn verify_token(app: &crate::app::App, token: &str) -> Result<Principal, RpcError> {
    let verified = app.tokens.verify(token, app.clock.now()).map_err(|e| {
        RpcError::Unauthenticated(match e {
            TokenError::Expired => AuthFailure::Expired,
            TokenError::Invalid => AuthFailure::Invalid,
        })
    })?;
    let user = app
        .store
        .user_by_id(verified.user_id)
        .await?
        .ok_or(RpcError::Unauthenticated(AuthFailure::Invalid))?;
    Ok(Principal {
        user,
        expires_at: verified.expires_at,
    })
}
