//! Users and their password hashes.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_column, unique_as, Store, StoreError};
use crate::core::{Role, Timestamp, User, UserId};

impl Store {
    /// Inserts a user; an email taken already is `Duplicate("email")`.
    pub async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO users (id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(user.id.to_string())
            .bind(&user.email)
            .bind(password_hash)
            .bind(user.role.as_str())
            .bind(now.as_millis())
            .execute(self.pool())
            .await
            .map_err(unique_as("email"))?;
        Ok(())
    }

    pub async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, email, role FROM users WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?;
        row.map(|row| user_from_row(&row)).transpose()
    }

    /// The user with this (normalised) email and their password hash.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<(User, String)>, StoreError> {
        let row = sqlx::query("SELECT id, email, role, password_hash FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?)))
    }
}

fn user_from_row(row: &AnyRow) -> Result<User, StoreError> {
    Ok(User {
        id: id_column(row, "users", "id")?,
        email: row.try_get("email")?,
        role: Role::parse(&row.try_get::<String, _>("role")?)
            .ok_or_else(|| StoreError::corrupt("users", "unknown role"))?,
    })
}
