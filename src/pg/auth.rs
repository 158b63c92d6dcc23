//! The authentication exchange after the startup message: trust, cleartext,
//! MD5 and SCRAM-SHA-256 (with -PLUS channel binding over TLS). GSSAPI, SSPI
//! and anything else are refused with a message saying what to configure.

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256};
use postgres_protocol::message::backend::{AuthenticationSaslBody, Message};
use postgres_protocol::message::frontend;

use super::PgError;
use super::conninfo::ChannelBindingMode;
use super::errfields::ServerMessage;
use super::wire::{Frame, Wire};

/// How the server authenticated us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No password asked (trust, peer, cert).
    Trust,
    Cleartext,
    Md5,
    ScramSha256,
    /// SCRAM bound to the TLS channel (`tls-server-end-point`).
    ScramSha256Plus,
}

pub struct AuthContext<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub tls: bool,
    /// The server certificate's channel-binding hash, when TLS is on and its
    /// signature algorithm defines one.
    pub server_end_point: Option<&'a [u8]>,
    pub channel_binding: ChannelBindingMode,
}

impl AuthContext<'_> {
    fn auth_error(&self, message: impl Into<String>) -> PgError {
        PgError::Auth { user: self.user.to_string(), message: message.into() }
    }

    fn password(&self, method: &str) -> Result<&str, PgError> {
        self.password.ok_or_else(|| {
            self.auth_error(format!(
                "the server asks for a password ({method}) but none was given (conninfo password, PGPASSWORD or the password file)"
            ))
        })
    }

    fn refuse_without_binding(&self, method: &str) -> Result<(), PgError> {
        if self.channel_binding == ChannelBindingMode::Require {
            return Err(self.auth_error(format!(
                "channel_binding=require, but the server asks for {method} authentication, which has no channel binding; \
                 use scram-sha-256 in pg_hba.conf and TLS"
            )));
        }
        Ok(())
    }
}

/// Runs the exchange up to AuthenticationOk.
pub async fn authenticate(wire: &mut Wire, ctx: &AuthContext<'_>) -> Result<AuthMethod, PgError> {
    let mut method = AuthMethod::Trust;
    loop {
        match next(wire, ctx).await? {
            Message::AuthenticationOk => {
                if ctx.channel_binding == ChannelBindingMode::Require && method != AuthMethod::ScramSha256Plus {
                    return Err(ctx.auth_error(
                        "channel_binding=require, but the server let us in without channel binding (is pg_hba.conf set to trust?)",
                    ));
                }
                return Ok(method);
            }
            Message::AuthenticationCleartextPassword => {
                ctx.refuse_without_binding("cleartext password")?;
                frontend::password_message(ctx.password("password")?.as_bytes(), wire.out())?;
                wire.flush().await?;
                method = AuthMethod::Cleartext;
            }
            Message::AuthenticationMd5Password(body) => {
                ctx.refuse_without_binding("MD5")?;
                let hash = md5_hash(ctx.user.as_bytes(), ctx.password("md5")?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), wire.out())?;
                wire.flush().await?;
                method = AuthMethod::Md5;
            }
            Message::AuthenticationSasl(body) => method = scram(wire, ctx, &body).await?,
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => return Err(unsupported("GSSAPI")),
            Message::AuthenticationSspi => return Err(unsupported("SSPI")),
            Message::AuthenticationKerberosV5 => return Err(unsupported("Kerberos V5")),
            Message::AuthenticationScmCredential => return Err(unsupported("SCM credential")),
            _ => return Err(PgError::Protocol("unexpected message during authentication".into())),
        }
    }
}

fn unsupported(method: &str) -> PgError {
    PgError::Unsupported(format!(
        "the server asks for {method} authentication, which walvault does not support; \
         use scram-sha-256 (or md5, trust, peer, cert) for this user in pg_hba.conf"
    ))
}

async fn scram(wire: &mut Wire, ctx: &AuthContext<'_>, body: &AuthenticationSaslBody) -> Result<AuthMethod, PgError> {
    let offered: Vec<String> = body.mechanisms().map(|m| Ok(m.to_string())).collect()?;
    let plus_offered = offered.iter().any(|m| m == SCRAM_SHA_256_PLUS);
    let plain_offered = offered.iter().any(|m| m == SCRAM_SHA_256);

    let binding_hash = ctx.server_end_point.filter(|_| ctx.channel_binding != ChannelBindingMode::Disable && plus_offered);
    let (mechanism, binding, method) = if let Some(hash) = binding_hash {
        (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash.to_vec()), AuthMethod::ScramSha256Plus)
    } else if ctx.channel_binding == ChannelBindingMode::Require {
        return Err(ctx.auth_error(if !ctx.tls {
            "channel_binding=require, but the connection is not encrypted (sslmode)".to_string()
        } else if !plus_offered {
            "channel_binding=require, but the server does not offer SCRAM-SHA-256-PLUS".to_string()
        } else {
            "channel_binding=require, but the server certificate's signature algorithm defines no channel binding".to_string()
        }));
    } else if plain_offered {
        // 'y' tells the server we could bind but it did not offer to; if it
        // did offer and we decline, 'n' is the only honest answer (a 'y'
        // then is treated as a downgrade attack).
        let binding = if ctx.tls && !plus_offered && ctx.channel_binding != ChannelBindingMode::Disable {
            ChannelBinding::unrequested()
        } else {
            ChannelBinding::unsupported()
        };
        (SCRAM_SHA_256, binding, AuthMethod::ScramSha256)
    } else {
        return Err(PgError::Unsupported(format!(
            "the server offers the SASL mechanisms {} and walvault supports only SCRAM-SHA-256",
            offered.join(", ")
        )));
    };

    let mut scram = ScramSha256::new(ctx.password("SCRAM")?.as_bytes(), binding);
    frontend::sasl_initial_response(mechanism, scram.message(), wire.out())?;
    wire.flush().await?;

    let Message::AuthenticationSaslContinue(body) = next(wire, ctx).await? else {
        return Err(PgError::Protocol("expected SASL continue from the server".into()));
    };
    scram.update(body.data()).map_err(|e| ctx.auth_error(format!("SCRAM exchange failed: {e}")))?;
    frontend::sasl_response(scram.message(), wire.out())?;
    wire.flush().await?;

    let Message::AuthenticationSaslFinal(body) = next(wire, ctx).await? else {
        return Err(PgError::Protocol("expected SASL final from the server".into()));
    };
    // Proves the server knows the password too; without this check an
    // impostor could accept any password.
    scram
        .finish(body.data())
        .map_err(|e| ctx.auth_error(format!("the server's SCRAM proof is wrong ({e}); it is not the server it claims to be")))?;
    Ok(method)
}

/// The next authentication message; server errors become `PgError`s (a bad
/// password as `PgError::Auth`), notices are logged.
async fn next(wire: &mut Wire, ctx: &AuthContext<'_>) -> Result<Message, PgError> {
    loop {
        match wire.read_frame().await? {
            Frame::Message(Message::NoticeResponse(body)) => ServerMessage::parse(body.fields())?.log(),
            Frame::Message(Message::ErrorResponse(body)) => {
                let m = ServerMessage::parse(body.fields())?;
                // 28P01 invalid_password: the server's text ("password
                // authentication failed for user ...") is what users search for.
                return Err(if m.code == "28P01" { ctx.auth_error(m.message) } else { m.into_error() });
            }
            Frame::Message(m) => return Ok(m),
            Frame::CopyData(_) | Frame::CopyBothResponse => {
                return Err(PgError::Protocol("COPY message during authentication".into()));
            }
        }
    }
}
